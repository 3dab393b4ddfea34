"""The lab's web UI (``difflab ui``): a Gradio app over the same library functions as the CLI.

:mod:`difflab.ui.jobs` runs heavy work one job at a time in a background thread, so two
browser tabs cannot start two trainings that fight for the device and a closed tab does not
stop a training; :mod:`difflab.ui.paths` keeps every path a browser sends inside the runs
folder; :mod:`difflab.ui.app` builds the tabs and launches the server (loopback by default).
"""
