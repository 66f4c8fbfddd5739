"""The teacher: backends behind one interface, and the client every stage uses."""
