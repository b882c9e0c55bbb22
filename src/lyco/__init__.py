"""lyco: LyCORIS adapters for any torch model, interchangeable with the tools people use."""

__version__ = "0.1.0"
