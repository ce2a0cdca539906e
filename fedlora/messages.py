"""Names of what travels between the server and a node (Flower records and their keys), in one place for both
sides. What each message holds is described in ``docs/messages.md``."""

#: ConfigRecord key of the resolved run config (YAML): sent once, in the handshake (and again to a node that
#: restarted); every train message names it by digest instead
CONFIG_KEY = "fedlora-config"
#: ConfigRecord key of the run config's digest in every train message
DIGEST_KEY = "fl.config-digest"
#: status of a reply from a node that does not hold the config a train message names (it restarted)
NEEDS_CONFIG = "needs-config"
