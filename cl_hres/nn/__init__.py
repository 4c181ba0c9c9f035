"""What is added to a frozen timm ViT: experts, adapters, prompts, heads, the model.

No Avalanche here: :class:`~cl_hres.nn.model.ContinualViT` is driven by plain method
calls, so it works in any training loop.
"""
