"""Social media image & metadata archiver: sources -> images in object storage -> sentiment -> PostgreSQL."""

__version__ = "0.1.0"
