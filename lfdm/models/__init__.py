"""The networks: LFAE (``lfae``), 3D U-Net (``unet3d``), flow conventions (``warp``); saving and
loading trained models (``checkpoints``)."""
