import collections, sys
for fn in sys.argv[1:]:
    cls=collections.Counter(); sub=collections.Counter(); tot=0
    for line in open(fn):
        stack,_,n=line.rstrip().rpartition(' '); n=int(n)
        fr=stack.split(';')
        if 'select (selectors.py' in fr[-1] or '_worker' in fr[-1] or 'Thread._bootstrap' in fr[0]: continue
        tot+=n
        s=stack
        if 'post_report' in s:
            k='post_report'
            for i,f in enumerate(fr):
                if f.startswith('post_report'):
                    nxt=fr[i+1] if i+1<len(fr) else '<self>'
                    sub[nxt.split(' (')[0]]+=n; break
        elif 'count (controller' in s or 'json_errors' in s: k='middleware-other'
        elif 'LoopLag' in s: k='looplag'
        elif 'get_status' in s: k='status'
        elif 'aiohttp' in s: k='aiohttp'
        else: k='other'
        cls[k]+=n
    print(fn, tot, dict(cls.most_common()))
    print('  post_report children:', sub.most_common(14))
