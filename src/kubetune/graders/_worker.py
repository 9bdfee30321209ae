"""The process a python grader runs in (started by sandbox.py as ``python -I _worker.py``; it imports
nothing of kubetune). Lines of JSON on stdin: the setup (source, limits), then one ``{sample, item}``
per sample; one line of JSON back on the original stdout for each: ``{"score": x}`` or ``{"error": why}``.
What the grader prints goes to stderr, so it cannot garble the replies.
"""

import json
import math
import os
import resource
import sys
import traceback

NETWORK = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname"}
# Without a network namespace a child process or a C call would get around the socket block, so those go too.
ESCAPES = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
           "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function"}


def guard(blocked):
    def hook(event, args):
        if event in blocked:
            what = "network access" if event.startswith("socket.") else f"{event}"
            raise PermissionError(f"{what} is not allowed in a python grader")
    return hook


def set_limits(limits):
    memory, files = limits["memory_bytes"], limits["file_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (files, files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    budget = math.ceil(cpu_used() + limits["cpu_seconds"] * (limits["samples"] + 1))
    resource.setrlimit(resource.RLIMIT_CPU, (budget, budget))  # the whole batch's; each sample gets its own below


def cpu_used():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_for_next(seconds):
    """CPU seconds from now: exactly, where the process may raise its hard limit (root); else the soft
    limit only, under the batch's hard limit (SIGXCPU ends the process at the soft one)."""
    target = math.ceil(cpu_used() + seconds)
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (target, target))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CPU, (min(target, hard), hard))


def describe(e):
    lines = traceback.format_exception(type(e), e, e.__traceback__)
    mine = [line for line in lines[1:] if line.startswith('  File "<grader>"') or not line.startswith("  File")]
    return "".join([lines[0]] + mine)[-2000:]  # the grader's own frames, not this file's


def main():
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(message):
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    setup = json.loads(sys.stdin.buffer.readline())
    set_limits(setup["limits"])
    sys.addaudithook(guard(NETWORK if setup["network_namespace"] else NETWORK | ESCAPES))
    namespace = {"__name__": "grader"}
    try:
        exec(compile(setup["source"], "<grader>", "exec"), namespace)
        grade = namespace["grade"]
    except BaseException as e:
        reply({"error": describe(e)})
        return
    reply({"ready": True})
    for line in sys.stdin.buffer:
        message = json.loads(line)
        cpu_for_next(setup["limits"]["cpu_seconds"])
        try:
            value = grade(message["sample"], message["item"])
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                reply({"error": f"grade() returned {str(value)[:100]!r}, not a finite number"})
            else:
                reply({"score": float(value)})
        except BaseException as e:
            reply({"error": describe(e)})


main()
