"""The base of kubetune's own errors: a failure whose message is one line meant for the user (no
secret, no data in it). The CLI and the trainer print it and exit non-zero, without a traceback;
catching this base spares them importing every module that raises one (numpy, pyarrow, torch)."""


class KubetuneError(Exception):
    pass
