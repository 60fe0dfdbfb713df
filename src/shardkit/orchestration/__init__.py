"""Running rows: one recipe or a campaign of them (``campaign``), each in its own process or container
(``containers``, through the Docker SDK), on Slurm (``slurm``), and the CPU smoke job (``smoke``)."""
