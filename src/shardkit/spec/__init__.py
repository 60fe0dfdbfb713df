"""What a run is, before anything runs: the typed configuration and its flags, the parallel method, model
presets, recipes and the reference table, and the resolution of all of it into one resolved run. Pure data
and arithmetic: nothing here imports torch."""
