"""Fine-tuning with Lightning Fabric. Imports only torch, torchvision, lightning, numpy."""
