"""The test harness: everything the tests share, and the chaos tool (``python -m launch.chaos``
is a thin command over ``chaos``). Nothing here is imported by the ftrain package, and no test
imports ``launch``.

    processes     run the real commands (training, ftrain-run, the ckpt tool); /proc scans,
                  signals and waits for the processes they leave
    checkpoints   committed and half-written steps, the newest checkpoint, runs compared
    traces        the per-rank sample traces of --trace-samples, read and checked
    logs          what a job's log says: torchrun's failure report, saves, storage retries
    secrets       a known secret looked for in texts, files, blobs and exceptions
    stores        storage that is slow or held on purpose (in-process, or via slowstore/)
    s3lab         moto's S3 server and the fault-injecting proxy in front of it
    s3            pytest fixtures over s3lab (a pytest plugin: tests/conftest.py loads it)
    tasks         small user tasks for the tests (--task tests.harness.tasks:ToyTask, ...)
    chaos         the chaos tool: reference runs, jobs killed at random moments, verdicts
    diskfull/     a sitecustomize that makes a folder's disk full, for a subprocess
"""
