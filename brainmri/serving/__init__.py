"""`brainmri serve`: the champion (or a named model) behind HTTP on Ray Serve.

served.py holds what a replica does with a request and a model (no Ray); app.py is the Ray
Serve deployment, the watcher that follows promotions, and the command."""
