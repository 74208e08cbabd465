"""Plain-PyTorch reference implementations: the numerical ground truth every backend is tested against."""
