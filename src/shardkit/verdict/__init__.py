"""Results against the reference table: one verdict per row (``diff``), and the report a person reads
(``report``: Markdown, CSV and figures from the same rows)."""
