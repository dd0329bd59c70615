"""BGP anycast route controller: POP agents and a central controller.

Layout (the folder names draw the architecture):
  config/   typed, frozen config objects and the loaders that build them (errors name the path)
  health/   the health-check state machine (pure) and the asyncio probes that feed it
  agent/    the POP agent: decision (pure), reconcile (pure) and the daemon loop (I/O shell)
  bgp/      ExaBGP: the text protocol (pure), the config renderer and the I/O speaker
  kernel/   netlink (pyroute2): VIP routes and loopback addresses the agent owns
  metrics/  every Prometheus metric name, in one place
  cli/      console entry points: anycast-agent, anycastctl
"""

__version__ = "0.1.0"
