"""blockgraph.spec"""
