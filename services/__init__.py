"""Rendezvous services: a small common core and one package per component."""
