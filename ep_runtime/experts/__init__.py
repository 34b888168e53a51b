"""Local expert compute over each dispatch layout and weights scheme."""
