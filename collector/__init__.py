"""kubetune component."""
