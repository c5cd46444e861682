"""kvray: Kandinsky Video 1.1 on Ray."""
