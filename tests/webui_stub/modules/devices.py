"""Stub of modules/devices.py (WebUI v1.10.1): the device the WebUI computes on."""
import torch

device = torch.device("cpu")
