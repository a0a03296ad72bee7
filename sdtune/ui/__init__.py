"""``sdtune ui``: the prep -> train -> compare -> export workflow in a browser, over the library and the CLI.

    workspace.py  the workspace folder and ``confine``, the one function every file path goes through
    photos.py     uploaded photos, their crop boxes, flags and captions; "Prepare" calls ``sdtune.prep.prep``
    jobs.py       long work (train, sample, eval, export, push) as ``sdtune ...`` processes whose state lives
                  in WORKSPACE/jobs/NAME/ (command, pid, log, exit code), so a second tab or a restarted
                  server finds them, and closing the page stops nothing
    server.py     the HTTP server (standard library ``http.server``) and its JSON endpoints
    static/       the page (plain HTML and JavaScript)

The page is plain HTML and JavaScript over a small JSON API rather than Gradio: per-photo crop boxes that
the user drags and resizes, and one file endpoint confined to the workspace, are a few lines each here,
while Gradio has no per-image crop-box component and serves files through its own routes (which would need
confining separately); and Gradio would pin an older Pillow than sdtune's.
"""
