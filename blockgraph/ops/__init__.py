"""blockgraph.ops"""
