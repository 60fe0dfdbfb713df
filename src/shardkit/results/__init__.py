"""The results of a run, shared by the engine that writes them and the verdict that reads them: the
document's schema, the failure type, the metrics formulas and atomic files."""
