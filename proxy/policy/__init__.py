"""Policy: the proxy's rules as pure functions over plain values. No I/O, no asyncio.

Which target a request names and where it goes (``targets``), which apps are allowed
(``allowed_apps``), who the caller claims to be (``callers``), which origins and hosts are
served (``origins``, ``request_head``), which address is the client (``client_ip``), which
headers travel each way (``headers``), what the gateway's logs are told (``metadata``), and the
URL rules of the Python client's TLS port (``python_port``). Each is table-tested.

May import: errors.
"""
