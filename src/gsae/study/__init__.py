"""The study on top of the library: `gsae compare` (train, evaluate and steer TopK and g-SAEs over
a grid), its aggregation and claims, the markdown report and the plots. Needs the optional
plotting extra: `pip install 'gsae[plots]'` (matplotlib, pillow)."""
