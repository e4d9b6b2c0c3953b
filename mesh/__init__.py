"""The network layer and the command line.

Map:
  cli.py        the `mesh` command; each subcommand imports its role only when chosen
  protocol.py   the data plane's frame: versioned, JSON header, raw tensor bytes, no pickle
  transport.py  frames over TCP: the donors' asyncio server, the client's blocking connection
  listener.py   the donors' listening socket (every waiting connection accepted at each loop turn)
  dht.py        the control plane: a hivemind DHT node, announcing and reading donor records
  lifetime.py   child processes (the DHT's) that stop when the process that started them dies
  records.py    what a donor announces, and the DHT keys
  routing.py    the fastest chain of donors over a layer range (pure)
  bans.py       temporary bans of failed donors, capped backoff (pure)
  placement.py  which layers a donor without --layers should serve (pure)
  status.py     `mesh status`: the swarm as a table
  launcher.py   start and stop local `mesh` processes (tests, benchmarks, `mesh up`)
  up.py         `mesh up`: a whole swarm on this machine in one command
"""
