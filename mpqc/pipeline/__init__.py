"""The drivers: build, export, profile, validate, search and the torchrun entry point.

Each takes the command's request (BuildOptions) and hands the stages below only the small frozen
settings values they need.
"""
