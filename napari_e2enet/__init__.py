"""napari-e2enet: E2ENet 3D medical image segmentation with dynamic sparse feature fusion."""

from .models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "list_models"]
