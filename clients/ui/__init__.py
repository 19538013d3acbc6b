"""`salfctl ui`: a local web page over the gateway (Explain Anything, local intervention, rules, gallery).

``session.py`` holds the state and the gateway calls, ``app.py`` the HTTP layer and its guards
(Host, Origin, launch secret), ``static/`` the page (plain HTML/JS/CSS, no build step, nothing fetched
from the network)."""
