# A gunicorn config file whose hooks each record how gunicorn would have called them.
# Every hook appends one JSON line to $GC_HOOK_LOG with the arguments' attributes.
import json
import os

workers = 1
threads = 2
worker_class = "gthread"
accesslog = "-"


def _record(name, **fields):
    line = dict(hook=name, os_pid=os.getpid(), **fields)
    fd = os.open(os.environ["GC_HOOK_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line, default=str) + "\n").encode())
    finally:
        os.close(fd)


def on_starting(server):
    server.log.info("on_starting hook: pid %s", server.pid)
    _record("on_starting", server_pid=server.pid, workers=server.cfg.workers,
            worker_class=server.cfg.worker_class_str, keepalive=server.cfg.keepalive)


def when_ready(server):
    server.log.info("Server is ready. Spawning workers")
    _record("when_ready", server_pid=server.pid, proc_name=server.proc_name)


def pre_fork(server, worker):
    _record("pre_fork", server_pid=server.pid, worker_pid=worker.pid, age=worker.age)


def post_fork(server, worker):
    server.log.info("Worker spawned (pid: %s)", worker.pid)
    _record("post_fork", server_pid=server.pid, worker_pid=worker.pid, age=worker.age, ppid=worker.ppid)


def post_worker_init(worker):
    worker.log.info("post_worker_init %s", worker.pid)
    _record("post_worker_init", worker_pid=worker.pid, age=worker.age)


def pre_request(worker, req):
    worker.log.debug("%s %s", req.method, req.path)
    _record("pre_request", worker_pid=worker.pid, method=req.method, path=req.path, query=req.query,
            headers=dict(req.headers))


def post_request(worker, req, environ, resp):
    _record("post_request", worker_pid=worker.pid, method=req.method, path=req.path, status=resp.status,
            status_code=resp.status_code, environ_path=environ["PATH_INFO"])


def worker_int(worker):
    worker.log.info("worker received INT or QUIT signal")
    _record("worker_int", worker_pid=worker.pid)


def worker_abort(worker):
    worker.log.info("worker received SIGABRT signal")
    _record("worker_abort", worker_pid=worker.pid)


def worker_exit(server, worker):
    _record("worker_exit", server_pid=server.pid, worker_pid=worker.pid)


def child_exit(server, worker):
    _record("child_exit", server_pid=server.pid, worker_pid=worker.pid)


def nworkers_changed(server, new_value, old_value):
    _record("nworkers_changed", server_pid=server.pid, new=new_value, old=old_value)


def on_reload(server):
    _record("on_reload", server_pid=server.pid)


def on_exit(server):
    _record("on_exit", server_pid=server.pid)
