"""Running the analysis: in the event loop or in a worker process reached over a socket."""
