"""The demo page (plain HTML and JavaScript, no build step), served at /demo.

A package only so that the wheel carries these files beside server.py.
"""
