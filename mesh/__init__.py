"""The network layer and the command line.

Map:
  cli.py   the `mesh` command; each subcommand imports its role only when chosen
           (today: `mesh check`; the DHT, donors and routing land here next)
"""
