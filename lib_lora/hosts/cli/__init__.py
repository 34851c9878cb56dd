"""The CLI's host: single-file SD1/SD2/SDXL checkpoints held as the WebUI's own module classes.

Dependencies run one way: ``config`` (and the leaves ``tokenizer``, ``sdxl_unet``, ``attention``)
<- ``ldm_yaml``, ``vae`` <- ``builders``; ``tokenizer`` <- ``conditioning``; ``sampling`` stands
alone; ``checkpoint`` (load, save, ``Checkpoint``) sits on top of them all.
"""
