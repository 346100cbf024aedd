"""bench: speed of NABLA against dense attention on a GPU.

`measure` times attention calls and transformer steps (what `nabla-convert bench` runs), `report` renders and
writes the results, `experiments` holds the further measurements the GPU scripts in scripts/ run. The package
itself imports nothing, so `nabla-convert bench --help` loads no torch.
"""
