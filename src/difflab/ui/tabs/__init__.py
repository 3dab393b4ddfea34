"""One module per tab of the web UI, each with a ``build(lab, page)`` and its actions.

A tab module holds the Gradio builder of its tab (Gradio is imported inside ``build`` only)
beside the plain functions its buttons call: ``start_*`` checks the input and queues a job,
``_*`` is the job's work. :mod:`difflab.ui.app` assembles the tabs in this order: Train,
Sample, Processes, Sweep, Stable Diffusion, Runs, Models, and the Jobs panel.
"""
