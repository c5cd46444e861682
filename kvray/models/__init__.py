"""Networks of Kandinsky Video 1.1."""
