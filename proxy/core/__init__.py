"""What every layer shares and nothing else: the call record, the OpenAI-shaped error body, credentials (key id and hash), attribution, time formatting. Imports nothing else of meterproxy."""
