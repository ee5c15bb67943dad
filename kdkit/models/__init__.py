"""Models: timm models by name, kdkit's registered variants, and the checkpoint format."""
