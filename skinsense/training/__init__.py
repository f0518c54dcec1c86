"""Fine-tuning with Lightning Fabric. Imports only torch, torchvision, lightning, numpy.

`loop`: `fit`, `train_one_epoch`, `evaluate`; `batches`: whole batches from the uint8 cache;
`launcher`: `train_in_subprocess` (a child process, torchrun for several GPUs); `worker`:
the child's entry point.
"""
