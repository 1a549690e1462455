"""Looking at the data: the HTML gallery, score plots, the geometry report, `stats show`
and the demo."""
