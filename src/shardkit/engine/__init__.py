"""The run engine: what happens inside the launcher and the ranks. The launcher starts ranks from a
resolved run; each rank builds the model, applies the parallel method from outside it (FSDP2 or ZeRO-3,
through ``strategy.Strategy``, or HF Trainer), trains, measures and writes the results."""
