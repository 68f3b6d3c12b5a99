"""Protocol nodes and I/O engines: the bottom of the node graph."""
