"""blockgraph.compiler"""
