-- release: the owner gives the account up (shutdown); an in-flight event goes back to the head.
-- KEYS: the account layout (_lib.lua)
-- ARGV: 1 account, 2 fencing token, 3 claim order, 4 random score
-- Returns {'released'}, {'drained'} or {'lost'}.
if not owns(ARGV[2]) then return {'lost'} end
return release(ARGV[1], ARGV[3], ARGV[4])
