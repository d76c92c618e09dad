# A stand-in device for tests/test_mqtt_client.py: firmware/mqtt.py's MQTTClient under the
# MicroPython unix port (or CPython), talking to a real mosquitto, reporting on stdout.
# Usage: micropython -X heapsize=64K mqtt_device.py <port> <client id> [key=value ...]
#   clean=0|1  ka=<s>  will=<topic>  sub=<filter>  max=<bytes>  backoff=<ms>
#   host=<name>  ca=<CA certificate, DER>      TLS to host, verified against that CA
#   pub=<topic> n=<count> size=<bytes>   publish n qos1 messages after the first connect,
#   rc=<r> gap=<ms>                      ...and go on until r reconnects happened, gap apart
#   exit=1                               disconnect cleanly once they are all acked
#   watch=1                              print "FAILS <n>" as connect failures mount
# Lines printed: "UP <reconnects> <session present 0|1>" after each connect (and subscribe),
# "MSG <topic> <retained 0|1> <dropped_incoming> <payload hex>", "PUB <i>", "BYE".
# The firmware directory (or a directory of precompiled .mpy) must be on the module path.
import asyncio
import sys

import mqtt

WILL_PAYLOAD = b'{"v":1,"online":false}'


def payload_for(i, size):
    """The test computes the same bytes to check what arrived."""
    return ("%d|" % i).encode() + bytes((i + k) & 0xFF for k in range(size))


def _hex(raw):
    return "".join("%02x" % b for b in raw)


async def main(port, client_id, opts):
    sub = opts.get("sub")
    will = opts.get("will")
    size = int(opts.get("size", "16"))
    first_up = asyncio.Event()

    def on_message(topic, payload, retained):
        print("MSG %s %d %d %s" % (topic, 1 if retained else 0, client.dropped_incoming,
                                   _hex(payload)))

    async def on_connect(c):
        if sub:
            await c.subscribe(sub, 1)
        print("UP %d %d" % (c.reconnects, 1 if c.session_present else 0))
        first_up.set()

    context = None
    if "ca" in opts:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.verify_mode = ssl.CERT_REQUIRED
        with open(opts["ca"], "rb") as f:
            context.load_verify_locations(cadata=f.read())
    client = mqtt.MQTTClient(
        client_id, opts.get("host", "127.0.0.1"), int(port), ssl=context,
        keepalive=int(opts.get("ka", "30")),
        clean_session=opts.get("clean", "1") == "1",
        will=(will, WILL_PAYLOAD, 1, False) if will else None,
        max_packet=int(opts.get("max", "4096")), on_message=on_message,
        on_connect=on_connect, backoff_max_ms=int(opts.get("backoff", "1000")))
    runner = asyncio.create_task(client.run())
    if opts.get("watch") == "1":
        asyncio.create_task(watch(client))
    await first_up.wait()
    if "pub" in opts:
        count = int(opts.get("n", "1"))
        until_rc = int(opts.get("rc", "0"))
        gap_s = int(opts.get("gap", "0")) / 1000
        i = 0
        while i < count or client.reconnects < until_rc:
            try:
                await client.publish(opts["pub"], payload_for(i, size), 1)
            except OSError:
                # Like the device journal: keep the message, wait for the link, send again.
                await client.connected()
                continue
            print("PUB %d" % i)
            i += 1
            if gap_s:
                await asyncio.sleep(gap_s)
    if opts.get("exit") == "1":
        await client.disconnect()
        await runner
        print("BYE")
        return
    await runner


async def watch(client):
    seen = 0
    while True:
        if client.connect_failures != seen:
            seen = client.connect_failures
            print("FAILS %d" % seen)
        await asyncio.sleep(0.05)


def _opts(args):
    opts = {}
    for arg in args:
        key, _, value = arg.partition("=")
        opts[key] = value
    return opts


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], _opts(sys.argv[3:])))
