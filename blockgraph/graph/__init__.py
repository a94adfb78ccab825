"""blockgraph.graph"""
