"""Credit risk bands: debt-to-income cut points learned from the client's book, validated with pydantic."""
