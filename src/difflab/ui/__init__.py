"""The lab's web UI (``difflab ui``): a Gradio app over the same library functions as the CLI.

:mod:`difflab.ui.app` assembles the page from one builder per tab (:mod:`difflab.ui.tabs`)
and launches the server; :mod:`difflab.ui.server` decides who may reach it and what it
answers (loopback by default, a login off loopback, only the Host names it was started for,
no training state or hidden files); :mod:`difflab.ui.lab` is what every session shares;
:mod:`difflab.ui.jobs` runs heavy work one job at a time in a background thread, so two
browser tabs cannot start two trainings that fight for the device and a closed tab does not
stop a training; :mod:`difflab.ui.paths` keeps every path a browser sends inside the runs
folder (and every model inside the models folder and the Hugging Face cache) and says what
may be served; :mod:`difflab.ui.limits` caps what one click may cost.
"""
