"""The blocks' modules: ordinary ``torch.nn.Module`` classes, one file per family (as ``blockgraph/blocks/``, whose
torch-free specs import them when a model is built). Layers call the ops of ``blockgraph.ops``, which pick their
kernels."""
