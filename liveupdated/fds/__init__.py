"""Handlers that know how to inspect, carry and rebuild one type of fd each."""
