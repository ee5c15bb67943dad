"""`kdkit demo`: the whole flow on real images (MNIST) with no download."""
